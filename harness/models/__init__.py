"""What a checkpoint looks like: architecture adapters, the random-init factory, the packer, the loader."""
