"""Pure ``nn.Module`` models: no training logic, no file layout."""
