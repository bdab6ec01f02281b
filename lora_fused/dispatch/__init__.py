"""Which backend and which strategy run a call.

``backend`` picks Triton or the torch backend per call and is the importer of the Triton
launchers; ``strategies`` holds the forced or default kernel strategy; ``tuning`` the measured
choice and its cache; ``segments`` the segment plan, the multi-adapter paths' per-batch
decision (read by the torch backend, so it sits below it). A docstring only: importing the
package imports none of its modules.
"""
