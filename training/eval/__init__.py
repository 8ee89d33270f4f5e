"""Evaluation of generated images against the subject's photos: scorers (faces, CLIP, DINO), the
run over images or folders, and the report (JSON, tables, annotated grid, chart).

The face detector choices live here, importable without torch (the CLI's --help and the node's combo)."""

# dlib's detectors: hog is fast, cnn finds more faces (slow on a CPU), hog+cnn tries cnn where hog finds none.
FACE_DETECTORS = ("hog+cnn", "hog", "cnn")
DEFAULT_FACE_DETECTOR = "hog+cnn"
# What the face metric and the identity loss need (dlib's detector, landmarks and face models).
DLIB_INSTALL = "pip install dlib-bin==20.0.1.post1 face_recognition_models==0.3.0"
