"""Layer 1, data: dataset readers (embedded MNIST, user copies) and client partitions."""
