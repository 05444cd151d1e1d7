"""mailkms: a Key Management Server for S/MIME."""
