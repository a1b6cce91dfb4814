"""The maths shared by the layers (``treeffn.layers``) and their fast kernels (``treeffn.kernels``): nonlinearities
and their codes, and the tree layer's reference definition (routing, masked dense output, routing thresholds,
statistics). Both floors above import from here; nothing here imports from them."""
