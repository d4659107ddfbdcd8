"""Knowledge Evolution (Taha et al., CVPR 2021): split masks, fit/reset hypotheses, generations, slim extraction."""
