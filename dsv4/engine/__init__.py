"""The inference engine (issue 4): sampling first; caches, batching and speculation follow."""
