//! Seeded noise bit-identical to the Python tools.
