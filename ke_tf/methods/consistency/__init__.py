"""Knowledge consistency (Liang et al., ICLR 2020): Trans-Nets between two nets' features, fuzziness orders."""
