"""mmskip.pipelines"""
