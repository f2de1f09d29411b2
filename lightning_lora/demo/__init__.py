"""The embedded demo: a procedural shapes world, its pretrained tiny model and style report."""
