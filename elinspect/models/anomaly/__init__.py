"""Anomaly detection: PaDiM (SeMaCNN stage 1), GAN-AE, the autoencoder baseline."""
