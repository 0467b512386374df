"""An example third-party routing policy for kvroute (see README.md beside this package).

The policy lives in ``kvroute_example_policy.policy``; this package file deliberately
imports nothing, so ``kvroute_example_policy.policy:LeastUncachedTokens`` and the
``kvroute.policies`` entry point both load exactly one module.
"""
