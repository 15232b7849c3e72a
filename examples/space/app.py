"""The ame-hf Hugging Face Space: merge checkpoints by Amortized Model Ensembling in the browser.
All of the UI lives in `ame_hf.space`; this is the file the Space runs (`app_file: app.py`)."""

from ame_hf.space import build_app

demo = build_app()

if __name__ == "__main__":
    # run_history=False: Gradio's run history would keep every input, the token box included.
    demo.launch(run_history=False)
