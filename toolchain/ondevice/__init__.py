"""On-device fine-tuning: host reference of device ZO rounds and per-target bundle packaging (docs/ondevice.md)."""
