"""LightningCLI configs, one YAML file per registered model."""
