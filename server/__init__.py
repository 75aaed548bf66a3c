"""Server side: the Flower ServerApp, the round loop and the DeviceGrid."""
