"""Layer 8, pipelines: `build`, `train`, `serve`, the budget gate (`select`) and `report`."""
