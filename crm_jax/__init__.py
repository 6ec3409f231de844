"""crm-jax: the Continuous Refinement Model (CRM) in JAX/Flax."""
