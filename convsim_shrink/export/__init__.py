"""What a shrunk model is written as: the native checkpoint format and the deployment formats."""
