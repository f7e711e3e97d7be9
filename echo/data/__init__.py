"""Speech data for Echo: sentence generator, TTS corpus builder, dataset and collator."""
