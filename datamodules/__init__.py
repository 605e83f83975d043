"""LightningDataModules of the zoo, one module per data family."""
