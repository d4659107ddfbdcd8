"""Model surgery and measuring: physical channel slicing, BN folding for deployment, MACs/params (paper convention)."""
