"""Worker: a model replica that leases data, pulls parameters and pushes gradients."""
