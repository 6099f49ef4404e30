"""The PostgreSQL compatibility matrix (`python -m tests.matrix`, `make test-matrix`): the
oracle property, the privilege tests and the command smoke test on every major version the
job supports, each on a throwaway server of its own (`servers`)."""
