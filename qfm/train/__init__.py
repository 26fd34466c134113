"""Training: checkpoints, engine functions (one epoch, prediction), and the teacher / student steps."""
