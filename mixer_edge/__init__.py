"""mixer-edge: compile MLP-Mixer classifiers with Apache TVM for edge and server targets.

Importing the package is cheap and pulls in neither torch, onnx nor TVM: the device-side
loader (`mixer_edge.runtime`) needs only the TVM runtime and numpy.
"""

__version__ = "0.1.0"
