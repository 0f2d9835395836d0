"""Fine-tuning: segmentation and classification from a pretrained encoder or from scratch."""
