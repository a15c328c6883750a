"""The op families, one module each: reference kernels, registration, public function."""
