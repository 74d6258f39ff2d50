"""The one-command demo: synthetic + Fashion-MNIST data, two training stages, held-out evaluation."""
