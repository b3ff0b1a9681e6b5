"""pvesim: a Proxmox VE API simulator for the lab and the tests (see README.md)."""
