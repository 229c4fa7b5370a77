"""Moving bytes: lazy tensors (`lazy`, pure data), read-ahead and background production
(`prefetch`), outputs that are never half-written (`atomic`), the manifest (`manifest`) and the
progress bar (`progress`), and hf://org/name resolved through the hub cache (`hub`)."""
