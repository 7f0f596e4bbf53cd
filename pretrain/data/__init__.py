"""Training data: WebDataset loading, multi-crop augmentation, masking and collate."""
