"""Pure-torch CSC-CTRL math: CSC layers, encoder/decoder, rate reduction, the CTRL objective. No Ray, MLflow, WebDataset or file I/O."""
