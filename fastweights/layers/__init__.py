"""nn.Modules, one per mechanism."""
