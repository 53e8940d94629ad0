"""The spin_lite web app from a checkout: `python app.py [--workspace DIR] [--port N] ...` (`spin-lite app`
does the same from an installed package). The app lives in spin_lite/app/; `demo` is here for `gradio app.py`.
"""
import os
import sys

from spin_lite.app.ui import build_demo, main

if __name__ == "__main__":
    sys.exit(main())
demo = build_demo(os.environ.get("SPIN_LITE_WORKSPACE", "."))
