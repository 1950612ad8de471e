"""adorym-dask."""
