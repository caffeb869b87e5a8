"""Data preparation: public-domain long documents for long-context evaluation."""
