"""The paper's maths: Convolutional Similarity, its pre-minimisation, and feature-map redundancy."""
