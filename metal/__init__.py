"""Metal kernel sources, shipped with the package."""
