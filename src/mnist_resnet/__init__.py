"""ResNet classifiers for MNIST-style 28x28 images: data, models, training, evaluation."""

__version__ = "0.1.0"
