"""MedTune Studio: the Slicer module's labeling loop in a web browser (``medtune studio``, DESIGN §4b).

Built on Kitware's trame-slicer (slicer-core's MRML scene, segmentation and Segment Editor logic, VTK rendering
streamed to the page). Every action drives the same Qt-free ``MedTuneLib`` session as the Slicer module; this
package only adds the page, the asyncio polling, the path guard and the per-session token.

``paths``  which files the browser may name (dataset + folders named at start)
``auth``   the per-session token on every HTTP request and websocket
``app``    the trame app: views + Segment Editor (trame-slicer) + the MedTune panel
``server`` ``serve()``: checks, banner with the tokenized URL, start/stop
"""
