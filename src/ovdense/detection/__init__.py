"""Open-vocabulary detection: F-ViT (CLIPSelf's Faster R-CNN on a frozen CLIP tower) on torchvision parts."""
