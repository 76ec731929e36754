"""mmskip.vision"""
