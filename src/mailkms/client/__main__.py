"""`python -m mailkms.client`: what the autostart files run, whatever PATH the session has."""

from mailkms.client._cli import main

if __name__ == "__main__":
    main()
