"""ovdense: dense open-vocabulary perception with CLIP."""
