"""Data: latent store, ingestion, input pipeline, the synthetic physics world."""
