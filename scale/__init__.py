"""perco.scale: beyond one machine (Ray Data batch jobs, Ray Serve online decoding, a Triton model repository).

Needs the `scale` extra (`pip install 'perco-engine[scale]'`); the runtime never imports it.
"""
