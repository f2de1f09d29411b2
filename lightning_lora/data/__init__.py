"""The style dataset: the DataModule and its images, buckets, captions, masks and caches."""
