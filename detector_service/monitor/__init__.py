"""The risk monitor learned from outcomes: its versioned features (computed incrementally per session), the
numbers of a trained model (the profile's ``monitor:`` section, no pickle) and their scoring (a dot product and a
sigmoid, no numerical library). Used online by the engine and offline by ``fama replay`` / ``fama analyze``;
training and cross-validation live in ``detector_service.offline``, and what a risk makes a turn do in
``detector_service.stakes``."""
