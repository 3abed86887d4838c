"""bckd calibration stage: INT8 quantization from real calibration images (torch-free).

* :mod:`calib.reader` draws calibration images from a dataset split (seeded, recorded by id) through
  exactly the runtime preprocessing (:mod:`runtime.data.preprocess`);
* :mod:`calib.quantize` writes an explicit Q/DQ INT8 ONNX with ONNX Runtime's static quantizer;
* :mod:`calib.nncf_ptq` writes an INT8 OpenVINO IR with NNCF;
* :mod:`calib.sensitivity` keeps the most sensitive layers in float until an accuracy budget holds;
* :mod:`calib.card` records what was calibrated on, so evaluation refuses to score on those images
  (architecture.md rule 5).

Heavy packages (onnx, onnxruntime, openvino, nncf) are imported only when used.
"""
