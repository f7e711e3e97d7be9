"""Echo: a pitch-aware speech-recognition transformer (data, features, model)."""
