"""`mlx-diffgemma bench` and the synthetic models it runs."""
